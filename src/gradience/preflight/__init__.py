"""`gradience check`: pre-flight rules for a LoRA + training config, before compute is spent.

`check` holds the rules, `profiles` the task profiles, `inputs` the reading of configs.
"""
