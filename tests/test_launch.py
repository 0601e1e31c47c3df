"""launch/: the gcloud commands the dry runs print, shellcheck, and the worker command run against stubs."""
import os
import pathlib
import shlex
import shutil
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu.sh"
SECRET = "hf_do_not_print_me_42"
COMMON = ["--name", "simpo-run", "--zone", "us-east5-a", "--project", "my-project"]
TRAIN = ["--config", "configs/llama3_8b_instruct.py:v5p-16", "--bucket", "gs://my-bucket/simpo/"]
EXCLUDE = r"--exclude=(^|.*/)\.tmp-[^/]*$"  # worker.sh never copies files being written


def dry_run(command, *args, env=None):
    """The commands a dry run prints, each split as the shell would."""
    proc = subprocess.run(["bash", str(TPU), command, "--dry-run", *COMMON, *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def option(argv, name):
    """The value of `--name=value` or `--name value` in one command."""
    for i, word in enumerate(argv):
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
        if word == name:
            return argv[i + 1]
    raise KeyError(name)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_are_shellcheck_clean():
    proc = subprocess.run(["shellcheck", *map(str, (ROOT / "launch").glob("*.sh"))], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_create_a_spot_tpu_vm_and_a_multislice_queued_resource():
    [vm] = dry_run("create", "--accelerator-type", "v5p-16", "--spot")
    assert vm[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and vm[5] == "simpo-run"
    assert (option(vm, "--accelerator-type"), option(vm, "--version"), option(vm, "--zone"),
            option(vm, "--project")) == ("v5p-16", "v2-alpha-tpuv5", "us-east5-a", "my-project")
    assert "--spot" in vm
    [qr] = dry_run("create", "--accelerator-type", "v6e-16", "--num-slices", "2", "--spot")
    assert qr[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert (option(qr, "--node-count"), option(qr, "--node-prefix"), option(qr, "--runtime-version")) == (
        "2", "simpo-run", "v2-alpha-tpuv6e")
    [pre] = dry_run("create", "--accelerator-type", "v4-32", "--preemptible")
    assert "--preemptible" in pre and option(pre, "--version") == "tpu-ubuntu2204-base"


def test_setup_installs_the_commit_on_every_worker_without_printing_secrets():
    scp, ssh = dry_run("setup", "--repo", "https://github.com/example/simpo_jax.git", "--commit", "0123abcd",
                       "--env", "WANDB_PROJECT=simpo", "--env-from-host", "HF_TOKEN", env={"HF_TOKEN": SECRET})
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and option(scp, "--worker") == "all"
    assert option(ssh, "--worker") == "all"
    remote = option(ssh, "--command")
    assert "git checkout --quiet 0123abcd" in remote and "pip install --quiet -e '.[tpu]'" in remote
    assert "https://github.com/example/simpo_jax.git" in remote


def _train_command(argv):
    """The training command inside the ssh --command (after launch/worker.sh OUT DEST)."""
    words = shlex.split(option(argv, "--command"))
    start = words.index("python3")
    return words[start:words.index(">")], words


def test_train_runs_the_same_command_on_every_worker():
    [ssh] = dry_run("train", *TRAIN, "--", "--config.loss.beta=10", "--config.loss.gamma_beta_ratio=0.3")
    assert ssh[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and option(ssh, "--worker") == "all"
    train, words = _train_command(ssh)
    assert train == ["python3", "-m", "simpo_jax.train", "--config", "configs/llama3_8b_instruct.py:v5p-16",
                     "--config.train.output_dir=$HOME/runs/llama3_8b_instruct",
                     "--config.checkpoint.directory=gs://my-bucket/simpo/llama3_8b_instruct/checkpoints",
                     "--config.loss.beta=10", "--config.loss.gamma_beta_ratio=0.3"]
    assert words[words.index("launch/worker.sh") + 2] == "gs://my-bucket/simpo/llama3_8b_instruct/output"
    [multi] = dry_run("train", *TRAIN, "--num-slices", "2")
    assert multi[3] == "queued-resources" and option(multi, "--node") == "all" and option(multi, "--worker") == "all"
    assert "--config.mesh.dcn_data=2" in _train_command(multi)[0]


def test_onpolicy_resumes_from_the_bucket_on_worker_zero_then_runs_on_every_worker():
    onpolicy = ["--config", "configs/llama3_8b_instruct_onpolicy.py:v5p-16", "--bucket", "gs://my-bucket/simpo/"]
    restore, ssh = dry_run("onpolicy", *onpolicy, "--stage", "sample", "--", "--config.generate.max_prompts=512")
    assert option(restore, "--worker") == "0"
    assert ("gcloud storage rsync --recursive gs://my-bucket/simpo/llama3_8b_instruct_onpolicy/output "
            "$HOME/runs/llama3_8b_instruct_onpolicy") in option(restore, "--command")
    assert option(ssh, "--worker") == "all"
    command, words = _train_command(ssh)
    assert command == ["python3", "-m", "simpo_jax.onpolicy", "--config", "configs/llama3_8b_instruct_onpolicy.py:v5p-16",
                       "--output", "$HOME/runs/llama3_8b_instruct_onpolicy", "--stage", "sample",
                       "--config.generate.max_prompts=512"]
    assert words[words.index("launch/worker.sh") + 2] == "gs://my-bucket/simpo/llama3_8b_instruct_onpolicy/output"
    assert words[words.index("launch/worker.sh") - 2:words.index("launch/worker.sh")] == [
        "env", "SIMPO_JAX_SYNC_EVERY=300"]  # shards reach the bucket while it runs
    proc = subprocess.run(["bash", str(TPU), "onpolicy", "--dry-run", *COMMON, *onpolicy, "--stage", "train"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--stage must be all, sample or score" in proc.stderr
    proc = subprocess.run(["bash", str(TPU), "onpolicy", "--dry-run", *COMMON, *onpolicy, "--num-slices", "2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "onpolicy runs on one slice" in proc.stderr


def test_logs_follow_worker_zero_and_stop_sends_sigterm_everywhere():
    [logs] = dry_run("logs", *TRAIN)
    assert option(logs, "--worker") == "0" and "simpo_jax_llama3_8b_instruct.log" in option(logs, "--command")
    [stop] = dry_run("stop")
    assert option(stop, "--worker") == "all" and "pkill -TERM" in option(stop, "--command")
    [delete] = dry_run("delete", "--queued")
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "simpo-run"]


@pytest.mark.parametrize("args, message", [
    (["train", "--zone", "z"], "--name is required"),
    (["train", "--name", "n", "--zone", "z", "--config", "c.py", "--bucket", "/tmp/x"], "gs://"),
    (["create", "--name", "n", "--zone", "z", "--queued", "--preemptible"], "--spot, not --preemptible"),
    (["create", "--name", "n", "--zone", "z", "--accelerator-type", "h100-8"], "--runtime-version"),
    (["train", "--name", "n", "--zone", "z", *TRAIN, "--", "--beta=2"], "--config.<field>=<value>"),
    (["bogus", "--name", "n", "--zone", "z"], "unknown command"),
])
def test_bad_arguments_are_named(args, message):
    proc = subprocess.run(["bash", str(TPU), args[0], "--dry-run", *args[1:]], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_the_worker_command_runs_training_then_copies_outputs(tmp_path):
    """Run the printed --command in a shell whose python3 and gcloud are recording stubs."""
    [ssh] = dry_run("train", *TRAIN, "--", "--config.loss.beta=10")
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    (home / "simpo_jax").symlink_to(ROOT)
    (home / ".simpo_jax.env").write_text("export SHARED_SETTING=from-env-file\n")
    for name in ("python3", "gcloud"):
        stub = bin_dir / name
        stub.write_text(f'#!/bin/bash\necho "{name} $* SHARED_SETTING=$SHARED_SETTING" >> "$HOME/calls"\n'
                        + ('mkdir -p "$HOME/runs/llama3_8b_instruct"\n' if name == "python3" else ""))
        stub.chmod(0o755)
    env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}")
    subprocess.run(["bash", "-c", option(ssh, "--command")], env=env, check=True, timeout=60)
    deadline = time.time() + 30
    while time.time() < deadline and len((home / "calls").read_text().splitlines() if (home / "calls").exists()
                                         else []) < 2:
        time.sleep(0.1)
    python, gcloud = (home / "calls").read_text().splitlines()
    assert python == (f"python3 -m simpo_jax.train --config configs/llama3_8b_instruct.py:v5p-16 "
                      f"--config.train.output_dir={home}/runs/llama3_8b_instruct "
                      "--config.checkpoint.directory=gs://my-bucket/simpo/llama3_8b_instruct/checkpoints "
                      "--config.loss.beta=10 SHARED_SETTING=from-env-file")
    assert gcloud.startswith(f"gcloud storage rsync --recursive {EXCLUDE} {home}/runs/llama3_8b_instruct "
                             "gs://my-bucket/simpo/llama3_8b_instruct/output")


def test_the_worker_copies_the_output_while_the_command_runs_with_a_sync_period(tmp_path):
    """SIMPO_JAX_SYNC_EVERY=1: copies during a 3.5-second command, then the final copy, never two at once; the
    exit status is kept, and nothing outlives the worker (its output pipe closes when the command ends)."""
    bin_dir, calls, out = tmp_path / "bin", tmp_path / "calls", tmp_path / "out"
    bin_dir.mkdir()
    # A copy takes 0.3 s and records its start and end: overlapping copies would interleave.
    (bin_dir / "gcloud").write_text(f'#!/bin/bash\necho "start $*" >> {calls}\nsleep 0.3\necho end >> {calls}\n')
    (bin_dir / "gcloud").chmod(0o755)

    def worker(period, seconds):
        env = dict(os.environ, HOME=str(tmp_path), PATH=f"{bin_dir}:{os.environ['PATH']}",
                   SIMPO_JAX_SYNC_EVERY=str(period))
        began = time.time()
        proc = subprocess.run(["bash", str(ROOT / "launch" / "worker.sh"), str(out), "gs://b/run/output", "bash",
                               "-c", f"mkdir -p {out}; sleep {seconds}; exit 3"], env=env, capture_output=True,
                              timeout=60)
        return proc.returncode, time.time() - began

    status, _ = worker(1, 3.5)
    assert status == 3
    lines = calls.read_text().splitlines()
    assert len(lines) >= 6 and lines[0::2] == [f"start storage rsync --recursive {EXCLUDE} {out} gs://b/run/output"] * (
        len(lines) // 2) and lines[1::2] == ["end"] * (len(lines) // 2)  # copies one after another
    time.sleep(1.5)
    assert len(calls.read_text().splitlines()) == len(lines)  # the periodic copies stopped with the command
    status, seconds = worker(30, 1)  # a long period: its sleep must not hold the output open
    assert status == 3 and seconds < 10


def test_sigterm_to_a_waiting_train_stops_the_slices_training_and_waits_for_it(tmp_path):
    """`train --wait` (what sweeps run) sent SIGTERM: every worker is stopped (saves), then it exits 143."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    # The ssh that runs the training blocks until `stop` (pkill -TERM on the workers) releases it, as the real
    # training saves and exits on SIGTERM; every call is recorded.
    (bin_dir / "gcloud").write_text(f"""#!/bin/bash
echo "gcloud $*" >> {calls}
case "$*" in
  *worker.sh*) echo training-started >> {calls}
               while [ ! -e {tmp_path}/released ]; do sleep 0.05; done
               echo training-saved-and-ended >> {calls} ;;
  *pkill*) touch {tmp_path}/released ;;
esac
""")
    (bin_dir / "gcloud").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = subprocess.Popen(["bash", str(TPU), "train", *COMMON, *TRAIN, "--wait"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while "training-started" not in (calls.read_text() if calls.exists() else ""):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    lines = calls.read_text().splitlines()
    stop = next(i for i, line in enumerate(lines) if "pkill -TERM -f" in line)
    assert "--worker=all" in lines[stop] and lines[-1] == "training-saved-and-ended"  # waited for the save
    assert "stopping the training on every worker" in err
