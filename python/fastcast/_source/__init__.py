"""Where a conversion reads from: the model folder (``folder``), torch.save files
(``torchfile``), config.json (``config``), the Hugging Face cache (``hf_cache``) and
what a model's quantization is (``quantization``). Read and validated, nothing written.
"""
