"""The task engine: persistent tasks, the scheduler, executors, retries and the DLQ, workflows, draining.

Layout (the deterministic core apart from I/O):
- spec.py: what a task submission may say (validated before anything is proposed);
- state.py: the `task` state domain: tables, commands (submit, assign, start, report, ...), queries;
- workflow.py: workflow specs (DAG checks, CEL compiled at submit) and the `workflow` state domain;
- scheduler.py: a pure function from a snapshot of queued tasks and nodes to assignments;
- executors.py / container.py / agent_executor.py: the things that run one attempt on a node;
- runner.py: the node side (pull assignments, run them, stream output, report);
- engine.py: the TaskEngine plugin (leader loop + runner + tools);
- api.py / cli.py: client-side operations shared by the CLI and the plugin tools.
"""
