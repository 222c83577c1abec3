"""`adapterserve compare`: the same tasks measured in shared mode and in dedicated mode.

tasks.py lays the tasks out for both modes, measure.py runs one mode's server and
measures it, run.py runs both, report.py turns the measurements into the table, JSON,
Markdown and the plot."""
