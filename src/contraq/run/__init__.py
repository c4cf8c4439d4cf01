"""A run folder and what is built from it: ``parts`` (a run's model, tokenizer, prompts, reward
and fact split from its config), ``load`` (a trained run loaded back), ``folder`` (what keeps a
run folder safe: checkpoints, logs, its config.yaml, one trainer per folder) and
``hydra_record`` (Hydra's ``.hydra/`` record)."""
