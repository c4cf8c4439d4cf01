"""Configuration: ``schema`` (the structured config Hydra composes; each key declared once, in
its group's dataclass, with its range check), ``checks`` (every value checked up front: the
groups built, open groups' keys, cross-key and path checks; one-line errors, saved configs
upgraded) and ``settings`` (typed settings of the commands)."""
