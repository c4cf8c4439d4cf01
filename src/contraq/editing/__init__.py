"""Probing edited models with contraq's questions (DESIGN.md section 10).

- :mod:`contraq.editing.scores`: the editing literature's probes (efficacy, generalisation,
  locality) as teacher-forced completions of cloze prompts;
- :mod:`contraq.editing.editors`: the fine-tuning editor (a LoRA fitted to the edits with a
  KL-to-base term on control prompts) and the in-context editor (the edit stated in the prompt);
- :mod:`contraq.editing.models`: the base LM and an edited model (a `contraq edit` folder, a peft
  adapter or a Hugging Face folder made elsewhere), checked against the base;
- :mod:`contraq.editing.probe`: `contraq probe`, the edited model answering questions as the base
  LM answers in training, judged against each edit;
- :mod:`contraq.editing.summary`: the per-fact shares, the table, probe.md and probe.png;
- :mod:`contraq.editing.commands`: the two commands' settings and folders.
"""
