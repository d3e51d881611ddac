"""Ray keeps a process's authentication mode and the token it loaded: switching the mode through
`auth.set_process_mode` lets one process use a cluster with tokens and then one without."""
from __future__ import annotations

import os
import sys

from conftest import Result, run

# In a process of its own: the mode it ends with must not leak into this test session.
TOKEN_THEN_NO_TOKEN = """
import ray
from cluster import auth

def private_ray():
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")

auth.set_process_mode("token")
private_ray()
ray.shutdown()
auth.set_process_mode("disabled")
private_ray()

@ray.remote(num_returns="streaming")
def count(n):  # each item reported to its owner, this process: the worker calls in, sending no token
    for i in range(n):
        yield i

print("items", sum(ray.get(ref, timeout=30) for ref in count.remote(4)))
"""


def test_a_process_that_held_a_token_cluster_hears_from_the_workers_of_one_without(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}  # Ray writes the token it makes to ~/.ray/auth_token
    env.pop("RAY_AUTH_MODE", None)
    done: Result = run([sys.executable, "-c", TOKEN_THEN_NO_TOKEN], env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "items 6" in done.stdout
    assert (tmp_path / ".ray" / "auth_token").is_file()
