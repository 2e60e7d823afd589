"""Measured comparisons across seeds. The entry point is `runner` (`load_experiment`, `run_experiment`: an
experiment file's variants × seeds trained, evaluated and compared, what ``cmoe unimed experiment`` runs); beside
it the task study (`task_study`), paired statistics (`stats`) and the Markdown tables and plots (`report`).

May import: every layer below it (base modules, `data`, `model`, `evaluation`, `analysis`, `training`).
"""
