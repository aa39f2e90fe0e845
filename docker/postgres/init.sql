-- Run once by the postgres image on an empty data volume (POSTGRES_DB already created `airflow`).
CREATE DATABASE mlflow;
