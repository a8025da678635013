"""The cold-start engine: skeleton, plan, fetch, landing, executor, pipeline, timeline."""
