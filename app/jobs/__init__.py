"""Background jobs (retraining): one task function, two runners.

- `tasks.run_retrain`: the retrain task's transport (claim, heartbeat, progress, outcome); the
  retrain itself is `app.services.retrain` (snapshot, split, train, score, decide, register,
  activate).
- `runner`: `InProcessRunner` (a single thread in the API process, no broker) and `CeleryRunner`
  (publishes to `cxr worker` when `CXR_BROKER_URL` is set); `create_runner(settings)` picks one.
- `celery_app.create_celery_app(settings)`: the Celery app, built from settings.
- `heartbeat`: the running job's heartbeat thread and the reaper of silent jobs.
- `worker.worker_command`: `cxr worker`.

Submodules are imported lazily by their users so that importing `app.jobs` pulls in neither
Celery nor torch.
"""
