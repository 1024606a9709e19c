"""KFP pipelines (DAGs) of mmsae."""
