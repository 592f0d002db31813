"""The device half: on-device training and inference with ONNX Runtime, numpy and tokenizers.

Nothing under edgeft.device may import torch, transformers, peft or bitsandbytes:
a Raspberry Pi runs it from `pip install "edgeft[device]"`. tests/test_device_boundary.py
enforces this.
"""
