"""effrepro's engine: run a paper's experiment by config name, record it, compare it with the paper.

Nothing here imports a paper's code: a task is named in its config (`task.entry`) and loaded by name.
"""
