"""Text classification (`sequence-classification`): what differs from generation, stage by stage.

`data` (the labelled corpus split for training), `modeling` (the base model with a fresh head), `train`,
`distill` (soft-label distillation), `candidate` (loading and predicting), `evaluate` (macro-F1 by slice,
latency, throughput) and `mlflow_model` (the pyfunc contract). What both tasks use sits one floor down under
names that say so (`training`, `launcher`, `students`, `candidate_folder`, `prepared_data`, `corpus`,
`checkpoints`); `llmops.tasks` says which implementation each stage uses.
"""
