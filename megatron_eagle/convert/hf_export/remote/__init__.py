"""transformers remote code copied into every exported Eagle 2.5 directory.

These modules import only torch, transformers, numpy and PIL (never megatron or
megatron_eagle), and use the released model's module and class names, so the official
files can replace them one for one.
"""
