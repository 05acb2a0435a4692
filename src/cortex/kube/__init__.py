"""Kubernetes: kubeconfig contexts found on each node, Jobs run as `k8s_job` tasks, cluster capacity.

- kubeconfig.py: which contexts a node has (KUBECONFIG and ~/.kube/config, kubectl's merge rules), parsed
  without running exec or auth-provider plugins; only names, server URLs and namespaces leave the node.
- spec.py: the `k8s_job` task spec (validated at submit time) and the batch/v1 Job it becomes.
- client.py: one place that builds API clients for a context and turns client errors into actionable ones.
- jobs.py: the `k8s_job` executor: submit, stream pod logs, map the Job's status, delete on cancel/timeout.
- capacity.py: allocatable vs requested per context (pure summaries of nodes and pods) and placement.
- executor.py: the `k8s_job` executor the task engine finds through the `cortex.executors` entry point.
- records.py: the per-node record of contexts and capacity, published to the replicated key-value store.
- placement.py: where a `k8s_job` fits, judged on those records (the plugin's placement for the scheduler).
- plugin.py: the `kubernetes` plugin: tools, the `cluster://k8s` resource, the per-node published record.
"""
