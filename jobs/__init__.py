"""Offline work run as Ray jobs: data preparation, compression, evaluation, training, benchmarks.

Each module here is one job (`python -m jobs.<job>`, and the package `jobs.compress`): its config,
its arguments and `main`. What jobs share lives in the packages (data, models, compress, eval,
train, bench); no module imports a job (tests call their `main`).
"""
