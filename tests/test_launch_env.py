from instar.launch.env import detect


def test_single_process():
    assert detect({}).launcher == "single" and detect({}).world_size == 1


def test_torchrun():
    env = {"TORCHELASTIC_RUN_ID": "x", "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
           "MASTER_ADDR": "h", "MASTER_PORT": "2950", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}
    got = detect(env)
    assert (got.launcher, got.rank, got.local_rank, got.world_size, got.master_port) == ("torchrun", 3, 1, 4, 2950)


def test_deepspeed_launcher():
    got = detect({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"})
    assert (got.launcher, got.rank, got.world_size, got.distributed) == ("deepspeed", 1, 2, True)


def test_srun_one_task_per_rank():
    got = detect({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0"})
    assert (got.launcher, got.rank, got.local_rank, got.world_size) == ("slurm", 5, 1, 8)
    # an sbatch batch script (no step, one task) is a single process
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}).launcher == "single"
