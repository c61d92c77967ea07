"""The `ovis-batch` subcommands, one module each: its arguments (`add_parser`) and its handler (`run`),
which turns the parsed arguments into plain values and calls a workflow or a library function.

Handlers import torch, Ray and the workflows inside the function, so `ovis-batch --help` stays instant.
`ovis_batch.cli` only assembles these modules into one parser.
"""
