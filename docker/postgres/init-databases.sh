#!/bin/sh
# One PostgreSQL server, one database each for MLflow and Prefect (run once, on an empty volume).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
SQL
