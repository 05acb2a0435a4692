"""Who belongs to the cluster: the on-disk membership record, the join protocol (token or operator
approval, CA pinning), the admission and join-token domains (register, request, approve; tokens), the
membership domain (leave, forget, role changes) and liveness decisions."""
