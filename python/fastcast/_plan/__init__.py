"""What the output will be, decided before anything is written: shards, offsets and
each tensor's value kind (``shards``), the recipes of dequantized weights
(``dequantize``) and what ``--quantize`` makes of each tensor (``quantize``).
"""
