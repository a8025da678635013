"""The V2 inference service: HTTP front end, scheduler, repository, auth, metrics, config."""
