"""Push a continual lineage to the Hugging Face Hub, and continue it from ``hf-hub:`` on another machine.

    # machine A: train the first tasks from a timm model, push the merged model after every task
    HF_TOKEN=hf_... python examples/hub_lineage.py --repo-id my-org/resnet18-lineage --output runs/machine-a
    # machine B, later: continue from what is on the Hub, on new images, and push again
    HF_TOKEN=hf_... python examples/hub_lineage.py --repo-id my-org/resnet18-lineage --continue \\
        --data path/to/new/images --output runs/machine-b
    python examples/hub_lineage.py --smoke    # seconds, offline: trains and writes the card, pushes nothing
    HF_ENDPOINT=http://hub.local python examples/hub_lineage.py --repo-id org/name --smoke   # ... and pushes

Each call trains ``--num-tasks`` Branch-tuning tasks and pushes after every task
(``TrainConfig.push_to_hub``): ``model.safetensors``, ``config.json`` (with the branch history) and
a model card regenerated from the history and the run's metrics; SSL heads and optimiser state stay
in the local run folder. ``--continue`` starts from ``hf-hub:REPO`` instead of a timm model, so the
lineage goes on where the last push left it, on any machine with the token. At the end the
repository is downloaded again with plain timm and checked against the model just trained.
``--smoke`` without ``--repo-id`` trains a random-init ``test_resnet`` on digits and stops before the
Hub: it shows the model card a push would upload and loads the model with plain timm.

The token comes from ``HF_TOKEN`` or ``hf auth login`` and needs write access; ``HF_ENDPOINT``
points at another Hub (a mirror, or a test server).
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile

import timm
import torch

from timm_branch.hub import HubPushError
from timm_branch.cli import configure_logging
from timm_branch.train import ContinualRun, TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo-id", help="org/name on the Hub (created on the first push); required unless --smoke")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--continue", dest="resume_lineage", action="store_true",
                       help="start from hf-hub:REPO-ID, the lineage's latest push")
    start.add_argument("--pretrained", help="the timm model a new lineage starts from (default: resnet18.a1_in1k)")
    start.add_argument("--model", help="a timm architecture to start a new lineage from scratch instead")
    parser.add_argument("--data", default="digits", help="this machine's images: a folder, a .npz file, digits, ...")
    parser.add_argument("--num-tasks", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10, help="epochs per task")
    parser.add_argument("--output", help="the local run folder (default: runs/lineage; with --smoke a temporary folder)")
    parser.add_argument("--smoke", action="store_true",
                        help="1 epoch at 16 px, batch 8, no linear probe; without --pretrained/--model a random-init "
                             "test_resnet, and without --repo-id no push")
    args = parser.parse_args()
    if args.repo_id is None and (args.resume_lineage or not args.smoke):
        parser.error("--repo-id is required (or run --smoke alone, which pushes nothing)")
    if args.smoke:
        args.output = args.output or tempfile.mkdtemp(prefix="hub-lineage-smoke-")
        if args.pretrained is None and not args.resume_lineage:
            args.model = args.model or "test_resnet"
    configure_logging()  # each record once, huggingface_hub's too

    # hf-hub: picks the lineage up where its last push left it; otherwise a new lineage starts.
    start = f"hf-hub:{args.repo_id}" if args.resume_lineage else (None if args.model else args.pretrained or "resnet18.a1_in1k")
    config = TrainConfig(
        model=args.model or TrainConfig.model, pretrained=start, data=[args.data], num_tasks=args.num_tasks,
        strategy="branch", epochs=args.epochs, output=args.output or "runs/lineage", push_to_hub=args.repo_id,
        push_when="task",
    )
    if args.smoke:
        config = dataclasses.replace(config, epochs=1, image_size=16, batch_size=8, knn_k=5, linear_probe=False)
    try:
        final = ContinualRun(config, progress=not args.smoke).run()
    except HubPushError as err:  # no token: before any training
        raise SystemExit(f"hub_lineage.py: {err}") from None
    if args.repo_id is None:
        print(f"no --repo-id: nothing was pushed. The model card a push of {final} would upload:\n")
        print((final / "README.md").read_text())
        timm.create_model(f"local-dir:{final}", pretrained=True)  # what a pull gives, here from the folder
        print(f'timm.create_model("local-dir:{final}", pretrained=True)')
        return

    # What anyone now gets from the Hub, with plain timm, is exactly the model trained here.
    pulled = timm.create_model(f"hf-hub:{args.repo_id}", pretrained=True).state_dict()
    local = timm.create_model(f"local-dir:{final}", pretrained=True).state_dict()
    assert pulled.keys() == local.keys() and all(torch.equal(pulled[k], local[k]) for k in local), \
        "the Hub holds other weights than the last task's"
    print(f"{args.repo_id} holds {final}")
    print(f'timm.create_model("hf-hub:{args.repo_id}", pretrained=True)')


if __name__ == "__main__":
    main()
