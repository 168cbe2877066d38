"""Python code generated from proto/ideogram4.proto by grpcio-tools (`python -m ideogram4_engine.serve.codegen`);
a test regenerates it and compares, so it never drifts from the .proto. Do not edit by hand."""
