#!/bin/sh
# Installs a local S3-protocol server (moto's `moto_server`) for tests/test_ingest_s3.py into its
# own venv, .ci/.venv-s3: botocore pins python-dateutil<3 while the main venv's kubernetes needs
# >=3, so moto cannot share .venv. The tests only run the server; they talk to it through
# pyarrow's own S3 client. Idempotent and quiet:  sh .ci/install-s3.sh
set -eu
cd "$(dirname "$0")"

[ -x .venv-s3/bin/moto_server ] && exit 0

python3 -m venv .venv-s3
.venv-s3/bin/pip install -q --disable-pip-version-check "moto[server]>=5.2,<6"
test -x .venv-s3/bin/moto_server
