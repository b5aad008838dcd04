"""The run around the step: the training loop (trainer) and its step (objectives: `Plan`, `objective_step`), the session
that loads what a run holds, the run directory, evaluation, the end-of-run report, the schedule and the toys."""
