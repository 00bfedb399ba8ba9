"""The LoRA file format and nothing else.

`safetensors_file` validates and reads safetensors (and weights-only `.bin`) files;
`keys` is the one key grammar (PEFT, kohya, diffusers); `reader` turns an adapter folder
or a single file into a stream of LoRA modules with their config semantics (closed world:
every tensor is a module's part, a base-weight copy or an other tensor, or its module is
refused); `writer` saves adapters as one unit; `scale` is the one home of PEFT's scale
formula. Nothing here computes a metric.
"""
