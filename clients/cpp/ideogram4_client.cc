// ideogram4_client: a C++ caller of the Ideogram 4 server over gRPC (proto/ideogram4.proto), built with
// Debian's libgrpc++-dev / protobuf-compiler-grpc by clients/cpp/build.sh. It is the proof that a C++ service
// can call the server, and a starting point for one.
//
//   ideogram4_client --target 127.0.0.1:9000 --prompt "a lighthouse" [--width 1024 --height 1024] [--n 1]
//                    [--seed S] [--preset NAME] [--steps N --guidance G[,G...]] [--output-format png|jpeg|webp]
//                    [--timeout SECONDS] [--stream] [--output out.png]
//
// stdout: one JSON line (outputs, seed, steps, synthetic, replica, total_s). stderr: "step k/n" per denoising
// step with --stream; on failure "error: CODE: message" (and "retry-after: S" when the server gave one).
// Exit codes: 0 written; 2 INVALID_ARGUMENT or a bad flag; 3 RESOURCE_EXHAUSTED or UNAVAILABLE (retry later);
// 4 DEADLINE_EXCEEDED; 5 the output file could not be written; 1 anything else.
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include "ideogram4.grpc.pb.h"

namespace {

const char* CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    default: return "UNKNOWN";
  }
}

int ExitCode(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::INVALID_ARGUMENT: return 2;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
    case grpc::StatusCode::UNAVAILABLE: return 3;
    case grpc::StatusCode::DEADLINE_EXCEEDED: return 4;
    default: return 1;
  }
}

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') { out += '\\'; out += c; }
    else if (static_cast<unsigned char>(c) < 0x20) { char buf[8]; std::snprintf(buf, sizeof buf, "\\u%04x", c); out += buf; }
    else out += c;
  }
  return out + "\"";
}

// Temporary name, then rename: never a half-written image under the final name.
bool WriteAtomically(const std::string& path, const std::string& data) {
  const std::string tmp = path + ".tmp-" + std::to_string(getpid());
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f.write(data.data(), static_cast<std::streamsize>(data.size())) || !f.flush()) {
      std::remove(tmp.c_str());
      return false;
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return false;
  }
  return true;
}

std::string OutputName(const std::string& path, int i, int n) {
  if (n == 1) return path;
  const auto dot = path.rfind('.');
  const auto slash = path.rfind('/');
  const bool has_ext = dot != std::string::npos && (slash == std::string::npos || dot > slash);
  return has_ext ? path.substr(0, dot) + "-" + std::to_string(i) + path.substr(dot)
                 : path + "-" + std::to_string(i);
}

int Usage(const std::string& why) {
  std::fprintf(stderr, "error: %s\nusage: ideogram4_client --prompt TEXT [--target HOST:PORT] [--width W] "
               "[--height H] [--n N] [--seed S] [--preset NAME] [--steps N] [--guidance G[,G...]] "
               "[--output-format png|jpeg|webp] [--timeout SECONDS] [--stream] [--output PATH]\n", why.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> flags = {{"--target", "127.0.0.1:9000"}, {"--output", "out.png"}};
  bool stream = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--stream") { stream = true; continue; }
    if (a.rfind("--", 0) != 0 || i + 1 >= argc) return Usage("bad argument " + a);
    flags[a] = argv[++i];
  }
  static const char* known[] = {"--target", "--prompt", "--width", "--height", "--n", "--seed", "--preset",
                                "--steps", "--guidance", "--output-format", "--timeout", "--output"};
  for (const auto& [k, v] : flags) {
    bool ok = false;
    for (const char* name : known) ok = ok || k == name;
    if (!ok) return Usage("unknown flag " + k);
  }
  if (!flags.count("--prompt")) return Usage("--prompt is required");

  ideogram4::v1::GenerateRequest req;
  double timeout_s = 3600;  // without --timeout: the server's default deadline applies; the client waits an hour
  try {
    req.set_prompt(flags["--prompt"]);
    if (flags.count("--width")) req.set_width(std::stoul(flags["--width"]));
    if (flags.count("--height")) req.set_height(std::stoul(flags["--height"]));
    if (flags.count("--n")) req.set_n(std::stoul(flags["--n"]));
    if (flags.count("--seed")) req.set_seed(std::stoull(flags["--seed"]));
    if (flags.count("--preset")) req.set_preset(flags["--preset"]);
    if (flags.count("--steps")) req.set_steps(std::stoul(flags["--steps"]));
    if (flags.count("--output-format")) req.set_output_format(flags["--output-format"]);
    if (flags.count("--guidance")) {
      std::stringstream ss(flags["--guidance"]);
      for (std::string g; std::getline(ss, g, ',');) req.add_guidance(std::stod(g));
    }
    if (flags.count("--timeout")) {
      timeout_s = std::stod(flags["--timeout"]);
      req.set_timeout_s(timeout_s);  // the server's deadline, queue included; the client waits 10 s longer
    }
  } catch (const std::exception&) {
    return Usage("a numeric flag is not a number");
  }

  grpc::ChannelArguments channel_args;
  channel_args.SetMaxReceiveMessageSize(-1);  // images are megabytes: gRPC's default limit is 4 MB
  auto channel = grpc::CreateCustomChannel(flags["--target"], grpc::InsecureChannelCredentials(), channel_args);
  auto stub = ideogram4::v1::ImageGeneration::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(static_cast<long long>((timeout_s + 10) * 1000)));
  ideogram4::v1::GenerateResponse resp;
  grpc::Status status;
  if (stream) {
    auto reader = stub->GenerateStream(&ctx, req);
    ideogram4::v1::GenerateEvent event;
    while (reader->Read(&event)) {
      if (event.has_progress()) {
        std::fprintf(stderr, "step %u/%u\n", event.progress().step(), event.progress().total());
      } else if (event.has_result()) {
        resp = event.result();
      }
    }
    status = reader->Finish();
  } else {
    status = stub->Generate(&ctx, req, &resp);
  }
  if (!status.ok()) {
    std::fprintf(stderr, "error: %s: %s\n", CodeName(status.error_code()), status.error_message().c_str());
    const auto& trailers = ctx.GetServerTrailingMetadata();
    const auto retry = trailers.find("retry-after");
    if (retry != trailers.end()) {
      std::fprintf(stderr, "retry-after: %s\n", std::string(retry->second.data(), retry->second.size()).c_str());
    }
    return ExitCode(status.error_code());
  }

  std::vector<std::string> outputs;
  for (int i = 0; i < resp.images_size(); ++i) {
    const std::string path = OutputName(flags["--output"], i, resp.images_size());
    if (!WriteAtomically(path, resp.images(i).data())) {
      std::fprintf(stderr, "error: cannot write %s\n", path.c_str());
      return 5;
    }
    outputs.push_back(path);
  }
  std::string list;
  for (const auto& o : outputs) list += (list.empty() ? "" : ", ") + JsonString(o);
  std::printf("{\"outputs\": [%s], \"seed\": %llu, \"steps\": %u, \"synthetic\": %s, \"replica\": %s, "
              "\"total_s\": %.3f}\n", list.c_str(), static_cast<unsigned long long>(resp.seed()), resp.steps(),
              resp.synthetic() ? "true" : "false", JsonString(resp.replica()).c_str(), resp.timings().total_s());
  return 0;
}
