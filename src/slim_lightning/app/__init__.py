"""The two runs and what surrounds them: ``compress_run`` / ``train_run`` (the bodies of
``compress.py`` / ``train.py``), ``preflight`` (cheap checks first), ``rundir`` (one run per
directory), ``export`` (the outputs both runs write), ``report`` / ``summarize`` (tables, plots)."""
