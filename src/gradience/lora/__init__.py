"""The LoRA file format and nothing else.

`safetensors_file` validates and reads safetensors (and weights-only `.bin`) files;
`keys` is the one key grammar (PEFT, kohya, diffusers); `reader` turns an adapter folder
or a single file into a stream of LoRA modules with their config semantics; `writer`
saves adapters atomically. Nothing here computes a metric.
"""
