"""Checks of a finished output against its source with torch (``verify``): values
compared by chunk (``compare``), quantized formats dequantized by an independent
reference (``references``).
"""
