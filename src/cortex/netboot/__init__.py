"""Netboot provisioning: iPXE scripts, a provisioning service, enrollments and ephemeral nodes (README: netboot/)."""
