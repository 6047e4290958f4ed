"""What users run a compressed model with: ``hf_quantizer`` (``from_pretrained`` of a packed
directory), ``servable`` (a vLLM-loadable copy), ``generate`` (streamed generation)."""
