"""Configuration: ``schema`` (the structured config Hydra composes), ``checks`` (every value
checked up front, one-line errors, saved configs upgraded) and ``settings`` (typed settings of
the commands)."""
