# An image with Ray, torch and ltstudy baked in, for `ltstudy cluster render --docker-image IMAGE`: the nodes
# then pull it and install nothing. Build and push it (docs/cluster.md, "Docker image"):
#   docker build -t ACCOUNT.dkr.ecr.REGION.amazonaws.com/ltstudy:$(git rev-parse --short HEAD) .
#   docker push ACCOUNT.dkr.ecr.REGION.amazonaws.com/ltstudy:$(git rev-parse --short HEAD)
FROM rayproject/ray:2.60.0-py311-gpu

# torch's CUDA wheels (the image's CUDA 12 driver stack), then ltstudy with its pinned Ray / Optuna / MLflow
RUN pip install --no-cache-dir "torch>=2.4,<=2.14.1" "torchvision>=0.19,<=0.29.1" "boto3>=1.26"
COPY --chown=ray:users pyproject.toml README.md /home/ray/ltstudy/
COPY --chown=ray:users ltstudy /home/ray/ltstudy/ltstudy
COPY --chown=ray:users search_spaces /home/ray/ltstudy/search_spaces
RUN pip install --no-cache-dir -e /home/ray/ltstudy && python -c "import ltstudy, torch, ray; print(ray.__version__)"
WORKDIR /home/ray
