"""The four stages, one module each: plain functions of the resolved config that write their files atomically into
the run dir and return what they produced. None of them imports MLflow or the tracking package."""
