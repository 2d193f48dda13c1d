#!/usr/bin/env python3
"""Checks manifests rendered from helm/ringbolt against the `ringbolt` binary.

Usage: check_helm_manifests.py RINGBOLT_BINARY RENDERED.yaml gpu|cpu|external

(external: GPU workers with an external etcd, any endpoints)

Every container that runs `ringbolt ROLE` must name a real role, set only RINGBOLT_* variables
that `ringbolt ROLE --help` lists, listen on the port it declares and advertises, and ask for
a GPU exactly when its device is `cuda:N`. Also: the roles a cluster needs are all there, the
Services select pods that exist, and etcd is the chart's own or the given endpoints.
"""
import re
import subprocess
import sys

import yaml


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def role_env(binary, role, cache={}):
    if role not in cache:
        r = subprocess.run([binary, role, "--help"], capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"`ringbolt {role} --help` failed: {r.stderr.strip()}")
        cache[role] = set(re.findall(r"\[env: (RINGBOLT_[A-Z0-9_]+)=", r.stdout))
    return cache[role]


def main():
    binary, path, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    roles = {}
    pods = []
    for d in docs:
        for k in ("apiVersion", "kind", "metadata"):
            if k not in d:
                fail(f"a manifest without {k}: {d}")
        if d["kind"] in ("Deployment", "StatefulSet"):
            pods.append(d)
    for d in pods:
        name = d["metadata"]["name"]
        spec = d["spec"]["template"]["spec"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        sel = d["spec"]["selector"]["matchLabels"]
        if any(labels.get(k) != v for k, v in sel.items()):
            fail(f"{name}: its selector {sel} does not match its pods' labels")
        for c in spec["containers"]:
            cmd = c.get("command", [])
            if cmd[:1] != ["ringbolt"]:
                continue
            role = cmd[1]
            known = role_env(binary, role)
            names = [e["name"] for e in c.get("env", [])]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                fail(f"{name}: environment variables set twice: {dup}")
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            for var in env:
                if var.startswith("RINGBOLT_") and var not in known:
                    fail(f"{name}: `ringbolt {role}` has no setting {var}")
            for need in ("RINGBOLT_CHECKPOINT", "RINGBOLT_ETCD", "RINGBOLT_LISTEN"):
                if need not in env:
                    fail(f"{name}: {need} is not set (`ringbolt {role}` requires it)")
            port = int(env["RINGBOLT_LISTEN"].rsplit(":", 1)[1])
            declared = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            if declared.get("grpc") != port:
                fail(f"{name}: listens on {port}, declares {declared}")
            adv = env.get("RINGBOLT_ADVERTISE", "")
            if not adv.endswith(f":{port}"):
                fail(f"{name}: advertises {adv!r}, listens on {port}")
            if "RINGBOLT_DATA_LISTEN" in env:
                dport = int(env["RINGBOLT_DATA_LISTEN"].rsplit(":", 1)[1])
                if declared.get("data") != dport:
                    fail(f"{name}: data plane on {dport}, declares {declared}")
            if "RINGBOLT_HTTP_LISTEN" in env:
                hport = int(env["RINGBOLT_HTTP_LISTEN"].rsplit(":", 1)[1])
                if declared.get("http") != hport:
                    fail(f"{name}: HTTP API on {hport}, declares {declared}")
            if "RINGBOLT_METRICS_LISTEN" in env:
                mport = int(env["RINGBOLT_METRICS_LISTEN"].rsplit(":", 1)[1])
                if declared.get("metrics") != mport:
                    fail(f"{name}: metrics on {mport}, declares {declared}")
            device = env.get("RINGBOLT_DEVICE", "cpu")
            gpus = (c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu", 0)
            if device.startswith("cuda") != (int(gpus) > 0):
                fail(f"{name}: device {device} with {gpus} GPUs")
            if kind == "gpu" and role != "coordinator" and not device.startswith("cuda"):
                fail(f"{name}: a GPU cluster's worker on {device}")
            if kind == "cpu" and device != "cpu":
                fail(f"{name}: a CPU cluster's worker on {device}")
            etcd = env["RINGBOLT_ETCD"]
            roles[role] = (name, etcd)
    for role in ("coordinator", "attention-worker", "expert-worker"):
        if role not in roles:
            fail(f"no {role} in the manifests")
    etcds = {e for _, e in roles.values()}
    if len(etcds) != 1:
        fail(f"the roles use different etcd endpoints: {etcds}")
    etcd = etcds.pop()
    has_etcd = any(d["kind"] == "StatefulSet" and "etcd" in d["metadata"]["name"] for d in docs)
    if kind == "external":
        if has_etcd:
            fail(f"an external etcd ({etcd}) and the chart's own")
    elif kind == "cpu":
        if has_etcd or etcd != "http://etcd-0:2379,http://etcd-1:2379":
            fail(f"external etcd: endpoints {etcd}, chart's own etcd {has_etcd}")
    else:
        host = re.match(r"http://([^:]+):2379$", etcd)
        if not has_etcd or not host:
            fail(f"the chart's etcd: endpoints {etcd}, StatefulSet {has_etcd}")
        if not any(d["kind"] == "Service" and d["metadata"]["name"] == host.group(1) for d in docs):
            fail(f"no Service {host.group(1)} for etcd")
    # Every Service selects the pods of some workload.
    for d in docs:
        if d["kind"] != "Service":
            continue
        sel = d["spec"]["selector"]
        if not any(
            all(p["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())
            for p in pods
        ):
            fail(f"Service {d['metadata']['name']} selects no pods: {sel}")
    # Every NetworkPolicy and PodDisruptionBudget applies to the pods of some workload; every
    # role's pods have a NetworkPolicy that lets the release's other pods in.
    covered = set()
    for d in docs:
        if d["kind"] == "NetworkPolicy":
            sel = d["spec"]["podSelector"]["matchLabels"]
        elif d["kind"] == "PodDisruptionBudget":
            sel = d["spec"]["selector"]["matchLabels"]
        else:
            continue
        hit = [
            p for p in pods
            if all(p["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())
        ]
        if not hit:
            fail(f"{d['kind']} {d['metadata']['name']} selects no pods: {sel}")
        if d["kind"] == "NetworkPolicy":
            peers = [f for rule in d["spec"]["ingress"] for f in rule.get("from", [])]
            if not peers:
                fail(f"NetworkPolicy {d['metadata']['name']} lets no pod of the release in")
            for p in hit:
                covered.add(p["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component"))
    if any(d["kind"] == "NetworkPolicy" for d in docs):
        for role in ("coordinator", "attention-worker", "expert-worker"):
            if role not in covered:
                fail(f"no NetworkPolicy for the {role} pods")
    print(f"{path}: {len(docs)} manifests; roles {sorted(roles)} check out against {binary}")


main()
