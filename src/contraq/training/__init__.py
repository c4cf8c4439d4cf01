"""`contraq train` and `contraq smooth`: ``train`` (the Lightning run), ``module`` (one GFlowNet
training step), ``losses`` (TB, SubTB, VarGrad), ``distributed`` (a step's batch across ranks),
``launch`` (ranks, Redis autostart, threads), ``callbacks`` (the run's Lightning callbacks) and
``smooth`` (maximum likelihood on a trained run's best questions)."""
