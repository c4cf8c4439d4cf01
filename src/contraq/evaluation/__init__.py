"""`contraq eval`, `report` and `rescore`: ``evaluate`` (the command), ``methods`` (each method,
in one process or in workers), ``baselines``, ``questions`` (a trained run's questions, scored),
``question_file`` (a questions file as the method `file`), ``reuse`` (baselines reused),
``metrics``, ``yields`` (the set per fact at a budget), ``stats`` (bootstrap intervals),
``plots``, ``report`` (report.md and eval's tables) and ``rescore`` (an eval judged again)."""
