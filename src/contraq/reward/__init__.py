"""Rewards (docs/DESIGN.md section 2): ``base`` (output, protocol, teacher-forced base-LM scores),
``combine`` (the contradiction reward's maths), ``likelihood``, ``answers`` (answering with the
base LM), ``contradiction`` and ``build`` (the reward a config names)."""
