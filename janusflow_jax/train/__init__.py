"""Training: the objective (AR, rectified flow, REPA), freezing and the optimizer, the jitted step, the run plan,
initialisation, checkpointing of the train state, metrics, the loop and the multi-stage recipe."""
