"""The task engine: persistent tasks, the scheduler, executors, retries and the DLQ, workflows, draining.

Layout (the deterministic core apart from I/O):
- spec.py: what a task submission may say (validated before anything is proposed);
- state.py: the `task` state domain: tables and the handlers of its commands (submit, assign, report, ...);
- validators.py / queries.py: the checks of those commands' arguments, and the domain's read-only queries;
- lifecycle.py: task rows and the transitions the task and workflow domains both make (insert, cancel, end);
- workflow.py: workflow specs (DAG checks, CEL compiled at submit) and the `workflow` state domain;
- scheduler.py: a pure function from a snapshot of queued tasks and nodes (and the plugins' placement rules
  for kinds that run elsewhere, such as k8s_job) to assignments;
- executors.py / container.py / agent_executor.py: the things that run one attempt on a node, found through
  the `cortex.executors` entry points;
- runner.py: the node side (pull assignments, run them, stream output, report);
- engine.py: the TaskEngine plugin (leader loop + runner + tools);
- api.py / cli.py: client-side operations shared by the CLI and the plugin tools.
"""
