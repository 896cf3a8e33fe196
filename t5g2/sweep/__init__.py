"""Config-driven sweeps: a sweep file's members (spec), run one after another on this machine
(runner) or as cluster jobs (launchers), and their results collected into tables and plots
(results)."""
