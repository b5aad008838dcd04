"""What one step passes between its moves and how it scores them: the objectives table (objective_table), the values
(batch: prompts, token space, sampling, rollouts), the teacher's and student's scores and their divergences' dispatch
(scores), and the health of the student's samples. The step itself, `objective_step`, is `mmopd/run/objectives.py`,
above the engines it drives."""
