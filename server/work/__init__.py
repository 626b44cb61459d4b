"""The work model: the states of series, jobs and deliveries, the one table of the
transitions between them, the policies applied on failure, and the worker loops that
call the stages and record their outcomes."""
