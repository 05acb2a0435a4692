# `cortex status` on the node talks to the local agent's configured gRPC address.
if [ -r /run/cortex/agent.env ]; then
    set -a; . /run/cortex/agent.env; set +a
fi
