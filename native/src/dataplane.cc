// Forseti's native data plane: a gRPC C++ server on the serving port.
//
// It answers ModelInfer (unary and streaming) itself for the versions the Python control
// plane hands it as routes: it parses the request, checks it against the model's config (the
// common case only: raw tensors of the configured names, datatypes and shapes), runs the
// version's backend, encodes the answer and records statistics into the version's own
// counters. Everything else (other RPCs, requests that fail or leave the common case, models
// without a route) is passed as method name and serialized bytes to a Python callable, which
// runs the existing servicer and hands back serialized bytes and a status: a client cannot
// tell which side answered.
//
// The Python interpreter is entered in one place per native call: around the backend's run,
// the statistics and the route's liveness check (the GIL is taken on a thread state kept per
// gRPC thread, so entering costs no allocation).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/auth_context.h>
#include <grpcpp/support/proto_buffer_reader.h>
#include <grpcpp/support/proto_buffer_writer.h>

#include <time.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "grpc_service.pb.h"

namespace py = pybind11;

namespace {

constexpr const char* kInfer = "/inference.GRPCInferenceService/ModelInfer";
constexpr const char* kStreamInfer = "/inference.GRPCInferenceService/ModelStreamInfer";
constexpr const char* kHealthWatch = "/grpc.health.v1.Health/Watch";

int64_t MonotonicNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

int64_t WallMs() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return int64_t(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

// Holds the GIL on a gRPC thread. The thread state is created once per thread and kept, so
// taking the GIL again is PyEval_RestoreThread alone.
class Gil {
 public:
  Gil() {
    thread_local PyThreadState* state = nullptr;
    if (state == nullptr) {
      PyGILState_Ensure();  // never released: the thread state stays for the thread's life
      state = PyThreadState_Get();
    } else {
      PyEval_RestoreThread(state);
    }
  }
  ~Gil() { PyEval_SaveThread(); }
  Gil(const Gil&) = delete;
  Gil& operator=(const Gil&) = delete;
};

struct InputSpec {
  std::string name;
  py::str py_name;  // the feed's key, made once
  std::string datatype;
  std::vector<int64_t> dims;  // without the batch dimension; -1: any
  int64_t item_nbytes;        // bytes of one batch item; 0: variable (BYTES)
  py::dtype dtype;
};

// One loaded version that the native side may serve. The Python control plane builds it,
// and is told (on_drop, on the event loop) once neither the routing table nor any running
// request holds it: that is when the version's drain may complete.
struct Route {
  std::string model;
  std::string version;
  int64_t max_batch = 0;  // 0: the model does not batch
  std::vector<InputSpec> inputs;
  std::vector<std::string> outputs;  // every output, in config order
  py::list py_outputs;                // the same, as the names handed to run()
  py::object lv;
  py::object run;
  py::object record_success;
  py::object on_drop;

  const InputSpec* input(const std::string& name) const {
    for (const auto& in : inputs)
      if (in.name == name) return &in;
    return nullptr;
  }
  bool has_output(const std::string& name) const {
    for (const auto& out : outputs)
      if (out == name) return true;
    return false;
  }

  ~Route() {
    PyGILState_STATE s = PyGILState_Ensure();
    if (on_drop) {
      try {
        on_drop();
      } catch (py::error_already_set& e) {
        e.discard_as_unraisable("forseti_native.Route.on_drop");
      }
    }
    // Python references go while the GIL is held, not after this body.
    inputs.clear();
    py_outputs.dec_ref();
    py_outputs.release();
    lv = py::object();
    run = py::object();
    record_success = py::object();
    on_drop = py::object();
    PyGILState_Release(s);
  }
};

using RoutePtr = std::shared_ptr<Route>;

class Server;
class Call;

// What Python holds for a call it answers: the call may be gone (cancelled and done), so
// every use checks under the lock.
struct CallLink {
  std::recursive_mutex mu;  // a Finish may run OnDone on the calling thread
  Call* call = nullptr;
  uint64_t id = 0;  // names the call to Python (its fallback task, for a cancellation)
};

std::atomic<uint64_t> next_link_id{1};

std::string Flatten(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  out.reserve(buffer.Length());
  for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

grpc::ByteBuffer FromBytes(const char* data, size_t n) {
  grpc::Slice slice(data, n);
  return grpc::ByteBuffer(&slice, 1);
}

// Text from the wire (a method path, a metadata key or value) as a Python str that never fails
// to decode: gRPC admits only printable ASCII there, and Latin-1 maps any byte to a character.
py::str WireText(const char* data, size_t n) {
  return py::reinterpret_steal<py::str>(PyUnicode_DecodeLatin1(data, Py_ssize_t(n), nullptr));
}

const char* DatatypeOf(const py::dtype& dt) {
  const char kind = dt.kind();
  const auto size = dt.itemsize();
  switch (kind) {
    case 'f':
      return size == 4 ? "FP32" : size == 8 ? "FP64" : size == 2 ? "FP16" : nullptr;
    case 'i':
      return size == 1 ? "INT8" : size == 2 ? "INT16" : size == 4 ? "INT32" : size == 8 ? "INT64" : nullptr;
    case 'u':
      return size == 1 ? "UINT8" : size == 2 ? "UINT16" : size == 4 ? "UINT32" : size == 8 ? "UINT64" : nullptr;
    case 'b':
      return "BOOL";
    default:
      return nullptr;
  }
}

struct ServerOptions {
  int max_receive_bytes = 8 * 1024 * 1024;
  int max_streams_per_connection = 0;
  int max_concurrent_rpcs = 0;
  int max_inflight = 0;
};

class Server {
 public:
  explicit Server(ServerOptions options) : options_(options) {}
  ~Server() {
    if (server_) {
      py::gil_scoped_release nogil;
      server_->Shutdown(std::chrono::system_clock::now());
      server_.reset();
    }
  }

  // ---- set-up, from Python ----------------------------------------------------------------
  void set_fallback(py::object fallback) { fallback_ = std::move(fallback); }
  void set_failure(py::object failure) { failure_ = std::move(failure); }
  void set_limit_refusal(py::object refusal) { limit_refusal_ = std::move(refusal); }
  void set_cancel(py::object cancel) { cancel_ = std::move(cancel); }
  void set_canned(py::bytes canned) { canned_ = std::string(canned); }
  void set_checked_methods(std::vector<std::string> methods) {
    std::unique_lock lock(mu_);
    checked_ = std::move(methods);
  }

  int start(const std::string& address, bool tls, const std::string& key_pem,
            const std::string& cert_pem, const std::string& root_pem, bool mutual);
  void shutdown(double grace_s) {
    if (!server_) return;
    py::gil_scoped_release nogil;
    auto deadline = std::chrono::system_clock::now() +
                    std::chrono::microseconds(int64_t(grace_s * 1e6));
    server_->Shutdown(deadline);
    server_->Wait();
  }

  // Replace one model's routes: version string ("" for the newest) -> route.
  void set_routes(const std::string& model, std::map<std::string, RoutePtr> routes) {
    std::unordered_map<std::string, RoutePtr> fresh(routes.begin(), routes.end());
    {
      std::unique_lock lock(mu_);
      if (fresh.empty())
        routes_.erase(model);
      else
        routes_[model].swap(fresh);
    }
    // `fresh` now holds the old routes; they go here, with the GIL held by the caller.
  }
  void clear_routes() {
    std::unordered_map<std::string, std::unordered_map<std::string, RoutePtr>> old;
    {
      std::unique_lock lock(mu_);
      old.swap(routes_);
    }
  }

  RoutePtr lookup(const std::string& model, const std::string& version) {
    std::shared_lock lock(mu_);
    auto m = routes_.find(model);
    if (m == routes_.end()) return nullptr;
    auto v = m->second.find(version);
    return v == m->second.end() ? nullptr : v->second;
  }
  bool checked(const std::string& method) {
    std::shared_lock lock(mu_);
    for (const auto& m : checked_)
      if (m == method) return true;
    return false;
  }

  const ServerOptions options_;
  py::object fallback_;
  py::object failure_;
  py::object limit_refusal_;
  py::object cancel_;
  std::string canned_;
  std::atomic<int> active_calls_{0};
  std::atomic<int64_t> live_calls_{0};  // reactors not yet done (a leak shows here)
  std::atomic<int> inflight_{0};
  std::atomic<uint64_t> native_calls_{0};
  std::atomic<uint64_t> fallback_calls_{0};
  // Where a native call's time goes (ns, summed): waiting for the GIL, and the whole call
  // from the parsed request to the encoded answer.
  std::atomic<uint64_t> gil_wait_ns_{0};
  std::atomic<uint64_t> native_ns_{0};

 private:
  class Service : public grpc::CallbackGenericService {
   public:
    explicit Service(Server* server) : server_(server) {}
    grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override;

   private:
    Server* server_;
  };

  std::shared_mutex mu_;
  std::unordered_map<std::string, std::unordered_map<std::string, RoutePtr>> routes_;
  std::vector<std::string> checked_;
  Service service_{this};
  std::unique_ptr<grpc::Server> server_;
};

// The result of trying a ModelInfer natively.
enum class Native { kAnswered, kRefused, kFallback };

class Call final : public grpc::ServerGenericBidiReactor {
 public:
  Call(Server* server, grpc::GenericCallbackServerContext* ctx)
      : server_(server), ctx_(ctx), link_(std::make_shared<CallLink>()) {
    link_->call = this;
    link_->id = next_link_id++;
    server_->live_calls_++;
    const std::string& method = ctx->method();
    stream_ = method == kStreamInfer;
    server_stream_ = method == kHealthWatch;
    infer_ = method == kInfer;
    if (server_->options_.max_concurrent_rpcs &&
        server_->active_calls_.fetch_add(1) >= server_->options_.max_concurrent_rpcs) {
      counted_ = true;
      Finish(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!"));
      return;
    }
    counted_ = server_->options_.max_concurrent_rpcs != 0;
    if (stream_ && server_->checked(method)) {
      // A restricted stream: Python's interceptor admits it (resume) or refuses it (finish).
      Fallback(nullptr);
      return;
    }
    StartRead(&in_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      if (stream_)
        FinishWith(grpc::Status::OK);
      else
        Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the call ended before its request"));
      return;
    }
    if (infer_ && !server_->canned_.empty()) {
      out_ = FromBytes(server_->canned_.data(), server_->canned_.size());
      StartWriteAndFinish(&out_, grpc::WriteOptions(), grpc::Status::OK);
      return;
    }
    if (infer_ || stream_) {
      if (!(infer_ && server_->checked(kInfer))) {
        grpc::Status status;
        Native result = TryInfer(&status);
        if (result == Native::kAnswered) {
          server_->native_calls_++;
          if (infer_) {
            StartWriteAndFinish(&out_, grpc::WriteOptions(), grpc::Status::OK);
          } else {
            Write(std::move(out_));
            ContinueReading();
          }
          return;
        }
        if (result == Native::kRefused) {
          if (infer_) {
            Finish(status);
          } else {
            Write(std::move(out_));  // the stream's error response
            ContinueReading();
          }
          return;
        }
      }
    }
    server_->fallback_calls_++;
    Fallback(&in_);
  }

  void OnWriteDone(bool ok) override {
    std::unique_lock lock(mu_);
    if (!ok) {
      writes_.clear();
      if (stream_ && read_deferred_ && !finished_ && !finish_pending_) {
        // The client is gone and no read is pending to tell us: end the call here.
        finished_ = true;
        writing_ = false;
        lock.unlock();
        Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
        return;
      }
    }
    if (!writes_.empty()) {
      current_ = std::move(writes_.front());
      writes_.pop_front();
      const bool read = read_deferred_ && writes_.size() < kMaxQueuedWrites;
      if (read) read_deferred_ = false;
      lock.unlock();
      StartWrite(&current_);
      if (read) StartRead(&in_);
      return;
    }
    writing_ = false;
    if (finish_pending_ && !finished_) {
      finished_ = true;
      lock.unlock();
      Finish(final_);
    }
  }

  // The client cancelled, its deadline passed or it went away: a call that Python is answering
  // has its task cancelled, as grpc.aio cancels a handler's task.
  void OnCancel() override {
    if (!handed_over_.load() || !server_->cancel_) return;
    try {
      Gil gil;
      server_->cancel_(link_->id);
    } catch (const std::exception&) {
    }
  }

  void OnDone() override {
    {
      std::lock_guard<std::recursive_mutex> lock(link_->mu);
      link_->call = nullptr;
    }
    if (counted_) server_->active_calls_--;
    server_->live_calls_--;
    delete this;
  }

  // ---- from Python (the link's lock is held) ------------------------------------------------
  void Write(grpc::ByteBuffer buffer) {
    std::unique_lock lock(mu_);
    if (finished_ || finish_pending_) return;
    if (writing_) {
      writes_.push_back(std::move(buffer));
      return;
    }
    writing_ = true;
    current_ = std::move(buffer);
    lock.unlock();
    StartWrite(&current_);
  }

  void FinishWith(grpc::Status status) {
    std::unique_lock lock(mu_);
    if (finished_ || finish_pending_) return;
    if (writing_) {
      finish_pending_ = true;
      final_ = std::move(status);
      return;
    }
    finished_ = true;
    lock.unlock();
    Finish(status);
  }

  // A unary answer: the response (when ok) and the status.
  void Answer(int code, const std::string& message, const std::string* payload) {
    if (!stream_ && !server_stream_ && code == 0 && payload != nullptr) {
      {
        std::lock_guard lock(mu_);
        if (finished_) return;
        finished_ = true;
      }
      out_ = FromBytes(payload->data(), payload->size());
      StartWriteAndFinish(&out_, grpc::WriteOptions(), grpc::Status::OK);
      return;
    }
    if (payload != nullptr) Write(FromBytes(payload->data(), payload->size()));
    FinishWith(grpc::Status(static_cast<grpc::StatusCode>(code), message));
  }

  // A stream's answer to one request (or its admission when payload is null): write it and
  // read the next request.
  void Resume(const std::string* payload) {
    if (payload != nullptr) Write(FromBytes(payload->data(), payload->size()));
    ContinueReading();
  }

  // The next request of a stream, unless the client has not read the answers queued so far:
  // then reading waits until it does (as a grpc.aio stream waits on its writes), so a client
  // that only sends cannot grow the queue without bound.
  void ContinueReading() {
    {
      std::lock_guard lock(mu_);
      if (finished_ || finish_pending_) return;
      if (writes_.size() >= kMaxQueuedWrites) {
        read_deferred_ = true;
        return;
      }
    }
    StartRead(&in_);
  }

 private:
  Native TryInfer(grpc::Status* status);
  Native Failed(const Route& r, const inference::ModelInferRequest& request, py::object error,
                int64_t start, grpc::Status* status) {
    try {
      py::object verdict =
          server_->failure_(r.lv, error, MonotonicNs() - start, stream_ ? "ModelStreamInfer" : "ModelInfer");
      return Refuse(r, request, verdict, status);
    } catch (const std::exception&) {
      *status = grpc::Status(grpc::StatusCode::INTERNAL, "internal error in the data plane");
      if (stream_) return Native::kFallback;
      return Native::kRefused;
    }
  }
  Native Refuse(const Route& route, const inference::ModelInferRequest& request, py::object verdict,
                grpc::Status* status);

  void Fallback(grpc::ByteBuffer* request) {
    handed_over_ = true;
    try {
      Gil gil;
      py::list metadata;
      for (const auto& [key, value] : ctx_->client_metadata()) {
        std::string k(key.data(), key.size());
        if (k.size() > 4 && k.compare(k.size() - 4, 4, "-bin") == 0)
          metadata.append(py::make_tuple(WireText(k.data(), k.size()), py::bytes(value.data(), value.size())));
        else
          metadata.append(py::make_tuple(WireText(k.data(), k.size()), WireText(value.data(), value.size())));
      }
      py::dict auth;
      auto auth_context = ctx_->auth_context();
      if (auth_context && auth_context->IsPeerAuthenticated()) {
        for (auto it = auth_context->begin(); it != auth_context->end(); ++it) {
          const auto& property = *it;
          py::str name = WireText(property.first.data(), property.first.size());
          if (!auth.contains(name)) auth[name] = py::list();
          auth[name].cast<py::list>().append(py::bytes(property.second.data(), property.second.size()));
        }
      }
      py::object timeout = py::none();
      auto deadline = ctx_->deadline();
      if (deadline != std::chrono::system_clock::time_point::max()) {
        timeout = py::float_(std::chrono::duration<double>(deadline - std::chrono::system_clock::now()).count());
      }
      py::object payload = py::none();
      if (request != nullptr) payload = py::bytes(Flatten(*request));
      const std::string& method = ctx_->method();
      const std::string peer = ctx_->peer();
      server_->fallback_(link_, WireText(method.data(), method.size()), payload, metadata, timeout,
                         WireText(peer.data(), peer.size()), auth);
    } catch (const std::exception& e) {
      FinishWith(grpc::Status(grpc::StatusCode::INTERNAL, "internal error in the data plane"));
    }
  }

  Server* server_;
  grpc::GenericCallbackServerContext* ctx_;
  std::shared_ptr<CallLink> link_;
  bool stream_ = false;
  bool server_stream_ = false;
  bool infer_ = false;
  bool counted_ = false;
  std::atomic<bool> handed_over_{false};
  grpc::ByteBuffer in_;
  grpc::ByteBuffer out_;

  std::mutex mu_;
  std::deque<grpc::ByteBuffer> writes_;
  grpc::ByteBuffer current_;
  static constexpr size_t kMaxQueuedWrites = 16;
  bool read_deferred_ = false;
  bool writing_ = false;
  bool finish_pending_ = false;
  bool finished_ = false;
  grpc::Status final_;
};

grpc::ServerGenericBidiReactor* Server::Service::CreateReactor(grpc::GenericCallbackServerContext* ctx) {
  return new Call(server_, ctx);
}

int Server::start(const std::string& address, bool tls, const std::string& key_pem,
                  const std::string& cert_pem, const std::string& root_pem, bool mutual) {
  std::shared_ptr<grpc::ServerCredentials> credentials;
  if (tls) {
    grpc::SslServerCredentialsOptions ssl(
        mutual ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
               : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
    ssl.pem_key_cert_pairs.push_back({key_pem, cert_pem});
    if (mutual) ssl.pem_root_certs = root_pem;
    credentials = grpc::SslServerCredentials(ssl);
  } else {
    credentials = grpc::InsecureServerCredentials();
  }
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(address, credentials, &port);
  builder.SetMaxReceiveMessageSize(options_.max_receive_bytes);
  builder.SetMaxSendMessageSize(-1);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  if (options_.max_streams_per_connection)
    builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, options_.max_streams_per_connection);
  builder.RegisterCallbackGenericService(&service_);
  {
    py::gil_scoped_release nogil;
    server_ = builder.BuildAndStart();
  }
  if (!server_ || port == 0) {
    server_.reset();
    throw std::runtime_error("could not bind " + address);
  }
  return port;
}

// Parse, check, run, encode, count. Anything outside the common case goes to Python, which
// words its error exactly as the Python data plane does.
Native Call::TryInfer(grpc::Status* status) {
  google::protobuf::Arena arena;
  auto* request = google::protobuf::Arena::CreateMessage<inference::ModelInferRequest>(&arena);
  {
    grpc::ByteBuffer copy(in_);  // slices are shared, not copied; in_ stays for a fallback
    grpc::ProtoBufferReader reader(&copy);
    if (!request->ParseFromZeroCopyStream(&reader)) return Native::kFallback;
  }
  const int64_t start = MonotonicNs();
  if (request->parameters_size() != 0) return Native::kFallback;
  const int n = request->inputs_size();
  for (int attempt = 0; attempt < 2; ++attempt) {
    RoutePtr route = server_->lookup(request->model_name(), request->model_version());
    if (!route) return Native::kFallback;
    const Route& r = *route;
    if (n == 0 || request->raw_input_contents_size() != n || size_t(n) != r.inputs.size())
      return Native::kFallback;
    // The fast path of protocol/tensors.py: fixed-size raw tensors that match exactly.
    std::vector<const InputSpec*> specs(n);
    int64_t batch = -1;
    for (int i = 0; i < n; ++i) {
      const auto& tensor = request->inputs(i);
      const InputSpec* spec = r.input(tensor.name());
      if (spec == nullptr || spec->item_nbytes == 0 || tensor.datatype() != spec->datatype ||
          tensor.parameters_size() != 0 || tensor.has_contents())
        return Native::kFallback;
      for (int j = 0; j < i; ++j)
        if (specs[j] == spec) return Native::kFallback;
      specs[i] = spec;
      const auto& shape = tensor.shape();
      int64_t b = 1;
      size_t offset = 0;
      if (r.max_batch) {
        if (shape.size() != int(spec->dims.size()) + 1) return Native::kFallback;
        b = shape[0];
        if (b <= 0 || b > r.max_batch || (batch != -1 && b != batch)) return Native::kFallback;
        offset = 1;
      } else if (shape.size() != int(spec->dims.size())) {
        return Native::kFallback;
      }
      for (size_t d = 0; d < spec->dims.size(); ++d)
        if (shape[int(d + offset)] != spec->dims[d]) return Native::kFallback;
      if (int64_t(request->raw_input_contents(i).size()) != b * spec->item_nbytes)
        return Native::kFallback;
      batch = b;
    }
    std::vector<const std::string*> names;
    for (const auto& out : request->outputs()) {
      if (out.parameters_size() != 0 || !r.has_output(out.name())) return Native::kFallback;
      bool seen = false;
      for (const auto* name : names) seen = seen || *name == out.name();
      if (!seen) names.push_back(&out.name());
    }

    const int64_t before_gil = MonotonicNs();
    Gil gil;
    server_->gil_wait_ns_ += MonotonicNs() - before_gil;
    // A version retired by a swap takes no new request, even before its route is replaced.
    if (r.lv.attr("retired").cast<bool>()) continue;
    if (server_->options_.max_inflight && server_->inflight_.load() >= server_->options_.max_inflight) {
      py::tuple verdict = server_->limit_refusal_(stream_ ? "ModelStreamInfer" : "ModelInfer");
      return Refuse(r, *request, verdict, status);
    }
    server_->inflight_++;
    struct Done {
      std::atomic<int>& n;
      ~Done() { n--; }
    } done{server_->inflight_};
    try {
      py::dict feeds;
      py::capsule keep(&arena, [](void*) {});  // arrays never outlive this call
      for (int i = 0; i < n; ++i) {
        const auto& tensor = request->inputs(i);
        std::vector<py::ssize_t> shape(tensor.shape().begin(), tensor.shape().end());
        const std::string& data = request->raw_input_contents(i);
        py::array array(specs[i]->dtype, shape, std::vector<py::ssize_t>{},
                        const_cast<char*>(data.data()), keep);
        py::detail::array_proxy(array.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
        feeds[specs[i]->py_name] = array;
      }
      py::list wanted = r.py_outputs;
      if (!names.empty()) {
        wanted = py::list();
        for (const auto* name : names) wanted.append(py::str(*name));
      }
      const int64_t decoded = MonotonicNs();
      py::list results = r.run(feeds, wanted);
      const int64_t answered = MonotonicNs();

      auto* response = google::protobuf::Arena::CreateMessage<inference::ModelInferResponse>(&arena);
      response->set_model_name(r.model);
      response->set_model_version(r.version);
      response->set_id(request->id());
      const size_t count = results.size();
      if (count != (names.empty() ? r.outputs.size() : names.size())) {
        PyErr_SetString(PyExc_RuntimeError, "the backend returned another number of outputs");
        throw py::error_already_set();
      }
      for (size_t i = 0; i < count; ++i) {
        py::array array = py::array::ensure(results[i], py::array::c_style);
        if (!array) throw py::error_already_set();
        const char* datatype = DatatypeOf(array.dtype());
        if (datatype == nullptr) {
          PyErr_SetString(PyExc_TypeError, "output datatype has no KServe name");
          throw py::error_already_set();
        }
        auto* out = response->add_outputs();
        out->set_name(names.empty() ? r.outputs[i] : *names[i]);
        out->set_datatype(datatype);
        for (py::ssize_t d = 0; d < array.ndim(); ++d) out->add_shape(array.shape(d));
        response->add_raw_output_contents(static_cast<const char*>(array.data()), array.nbytes());
      }
      grpc::ByteBuffer encoded;
      if (stream_) {
        auto* wrapped = google::protobuf::Arena::CreateMessage<inference::ModelStreamInferResponse>(&arena);
        wrapped->unsafe_arena_set_allocated_infer_response(response);
        grpc::ProtoBufferWriter writer(&encoded, grpc::kProtoBufferWriterMaxBufferLength, wrapped->ByteSizeLong());
        wrapped->SerializeToZeroCopyStream(&writer);
        wrapped->unsafe_arena_release_infer_response();
      } else {
        grpc::ProtoBufferWriter writer(&encoded, grpc::kProtoBufferWriterMaxBufferLength, response->ByteSizeLong());
        response->SerializeToZeroCopyStream(&writer);
      }
      const int64_t end = MonotonicNs();
      r.record_success(end - start, 0, decoded - start, answered - decoded, end - answered, batch, WallMs());
      out_ = std::move(encoded);
      server_->native_ns_ += end - start;
      return Native::kAnswered;
    } catch (py::error_already_set& e) {
      return Failed(r, *request, e.value(), start, status);
    } catch (const std::exception& e) {  // a cast that failed: a Python error to the handler
      return Failed(r, *request, py::reinterpret_steal<py::object>(PyObject_CallFunction(PyExc_RuntimeError, "s", e.what())), start, status);
    }
  }
  return Native::kFallback;
}

// A refusal decided natively, as (code, message) from Python: a status for a unary call, an
// error response for a stream.
Native Call::Refuse(const Route& r, const inference::ModelInferRequest& request, py::object verdict,
                    grpc::Status* status) {
  py::tuple t = verdict;
  const int code = t[0].cast<int>();
  const std::string message = t[1].cast<std::string>();
  if (!stream_) {
    *status = grpc::Status(static_cast<grpc::StatusCode>(code), message);
    return Native::kRefused;
  }
  inference::ModelStreamInferResponse error;
  error.set_error_message(message);
  auto* response = error.mutable_infer_response();
  response->set_model_name(request.model_name());
  response->set_model_version(request.model_version());
  response->set_id(request.id());
  (void)r;
  grpc::ByteBuffer encoded;
  {
    grpc::ProtoBufferWriter writer(&encoded, grpc::kProtoBufferWriterMaxBufferLength, error.ByteSizeLong());
    error.SerializeToZeroCopyStream(&writer);
  }
  out_ = std::move(encoded);
  return Native::kRefused;
}

// ---- a native closed-loop load generator (benchmarks only) ------------------------------------
//
// `concurrency` threads, each with its own connection, each sending `payload` to `method` and
// waiting for the answer before the next call, for `warmup_s` + `seconds`. It takes the
// Python client's ~300 us of CPU per call out of a throughput measurement.
struct LoadResult {
  std::vector<int64_t> latencies_ns;  // calls that ended after the warm-up
  uint64_t errors = 0;
  double seconds = 0;
};

LoadResult ClosedLoop(const std::string& target, const std::string& method, const std::string& payload,
                      int concurrency, double warmup_s, double seconds) {
  std::vector<std::thread> threads;
  std::vector<LoadResult> results(concurrency);
  const int64_t start = MonotonicNs();
  const int64_t recorded_from = start + int64_t(warmup_s * 1e9);
  const int64_t until = recorded_from + int64_t(seconds * 1e9);
  for (int t = 0; t < concurrency; ++t) {
    threads.emplace_back([&, t] {
      grpc::ChannelArguments args;
      args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // a connection of its own
      args.SetMaxReceiveMessageSize(-1);
      auto channel = grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
      grpc::GenericStub stub(channel);
      LoadResult& mine = results[t];
      grpc::Slice slice(payload.data(), payload.size());
      const grpc::ByteBuffer request(&slice, 1);
      while (true) {
        const int64_t t0 = MonotonicNs();
        if (t0 >= until) break;
        grpc::ClientContext context;
        context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
        grpc::ByteBuffer response;
        grpc::Status status;
        std::mutex done_mu;
        std::condition_variable done_cv;
        bool done = false;
        stub.UnaryCall(&context, method, grpc::StubOptions(), &request, &response,
                       [&](grpc::Status s) {
                         std::lock_guard lock(done_mu);
                         status = std::move(s);
                         done = true;
                         done_cv.notify_one();
                       });
        {
          std::unique_lock lock(done_mu);
          done_cv.wait(lock, [&] { return done; });
        }
        const bool ok = true;
        const int64_t t1 = MonotonicNs();
        if (!ok || !status.ok()) {
          mine.errors++;
          continue;
        }
        if (t0 >= recorded_from) mine.latencies_ns.push_back(t1 - t0);
      }
    });
  }
  for (auto& thread : threads) thread.join();
  LoadResult all;
  for (auto& r : results) {
    all.latencies_ns.insert(all.latencies_ns.end(), r.latencies_ns.begin(), r.latencies_ns.end());
    all.errors += r.errors;
  }
  all.seconds = seconds;
  return all;
}

}  // namespace

PYBIND11_MODULE(forseti_native, m) {
  m.doc() = "Forseti's native gRPC data plane (see docs/native.md)";

  py::class_<ServerOptions>(m, "ServerOptions")
      .def(py::init<>())
      .def_readwrite("max_receive_bytes", &ServerOptions::max_receive_bytes)
      .def_readwrite("max_streams_per_connection", &ServerOptions::max_streams_per_connection)
      .def_readwrite("max_concurrent_rpcs", &ServerOptions::max_concurrent_rpcs)
      .def_readwrite("max_inflight", &ServerOptions::max_inflight);

  py::class_<Route, RoutePtr>(m, "Route")
      .def(py::init([](std::string model, std::string version, int64_t max_batch,
                       std::vector<std::tuple<std::string, std::string, std::vector<int64_t>, int64_t, py::dtype>> inputs,
                       std::vector<std::string> outputs, py::object lv, py::object run,
                       py::object record_success, py::object on_drop) {
             auto r = std::make_shared<Route>();
             r->model = std::move(model);
             r->version = std::move(version);
             r->max_batch = max_batch;
             for (auto& [name, datatype, dims, item_nbytes, dtype] : inputs)
               r->inputs.push_back(InputSpec{name, py::str(name), datatype, dims, item_nbytes, dtype});
             r->outputs = std::move(outputs);
             for (const auto& name : r->outputs) r->py_outputs.append(py::str(name));
             r->lv = std::move(lv);
             r->run = std::move(run);
             r->record_success = std::move(record_success);
             r->on_drop = std::move(on_drop);
             return r;
           }),
           py::arg("model"), py::arg("version"), py::arg("max_batch"), py::arg("inputs"),
           py::arg("outputs"), py::arg("lv"), py::arg("run"), py::arg("record_success"),
           py::arg("on_drop"))
      .def_readonly("model", &Route::model)
      .def_readonly("version", &Route::version);

  py::class_<CallLink, std::shared_ptr<CallLink>>(m, "CallLink")
      .def_readonly("id", &CallLink::id)
      .def(
          "answer",
          [](CallLink& link, int code, const std::string& message, std::optional<py::bytes> payload) {
            std::string bytes;
            if (payload) bytes = std::string(*payload);
            py::gil_scoped_release nogil;
            std::lock_guard<std::recursive_mutex> lock(link.mu);
            if (link.call != nullptr) link.call->Answer(code, message, payload ? &bytes : nullptr);
          },
          py::arg("code"), py::arg("message"), py::arg("payload") = py::none(),
          "End the call: status code and message, and the response when the code is OK.")
      .def(
          "write",
          [](CallLink& link, py::bytes payload) {
            std::string bytes(payload);
            py::gil_scoped_release nogil;
            std::lock_guard<std::recursive_mutex> lock(link.mu);
            if (link.call != nullptr) link.call->Write(FromBytes(bytes.data(), bytes.size()));
          },
          "Send one message of a streaming response.")
      .def(
          "resume",
          [](CallLink& link, std::optional<py::bytes> payload) {
            std::string bytes;
            if (payload) bytes = std::string(*payload);
            py::gil_scoped_release nogil;
            std::lock_guard<std::recursive_mutex> lock(link.mu);
            if (link.call != nullptr) link.call->Resume(payload ? &bytes : nullptr);
          },
          py::arg("payload") = py::none(),
          "A stream goes on: send the answer to its last request (if any) and read the next.");

  m.def(
      "closed_loop",
      [](const std::string& target, py::bytes payload, int concurrency, double warmup_s, double seconds,
         const std::string& method) {
        std::string bytes(payload);
        LoadResult result;
        {
          py::gil_scoped_release nogil;
          result = ClosedLoop(target, method, bytes, concurrency, warmup_s, seconds);
        }
        py::dict out;
        out["latencies_ns"] = result.latencies_ns;
        out["errors"] = result.errors;
        out["seconds"] = result.seconds;
        return out;
      },
      py::arg("target"), py::arg("payload"), py::arg("concurrency"), py::arg("warmup_s"),
      py::arg("seconds"), py::arg("method") = kInfer,
      "Closed-loop unary calls from `concurrency` C++ threads with a connection each (benchmarks).");

  py::class_<Server>(m, "Server")
      .def(py::init<ServerOptions>())
      .def("set_fallback", &Server::set_fallback)
      .def("set_failure", &Server::set_failure)
      .def("set_limit_refusal", &Server::set_limit_refusal)
      .def("set_cancel", &Server::set_cancel)
      .def("set_canned", &Server::set_canned)
      .def("set_checked_methods", &Server::set_checked_methods)
      .def("start", &Server::start, py::arg("address"), py::arg("tls") = false,
           py::arg("key_pem") = "", py::arg("cert_pem") = "", py::arg("root_pem") = "",
           py::arg("mutual") = false)
      .def("shutdown", &Server::shutdown)
      .def("set_routes", &Server::set_routes)
      .def("clear_routes", &Server::clear_routes)
      .def_property_readonly("native_calls", [](Server& s) { return s.native_calls_.load(); })
      .def_property_readonly("fallback_calls", [](Server& s) { return s.fallback_calls_.load(); })
      .def_property_readonly("live_calls", [](Server& s) { return s.live_calls_.load(); })
      .def_property_readonly("gil_wait_ns", [](Server& s) { return s.gil_wait_ns_.load(); })
      .def_property_readonly("native_ns", [](Server& s) { return s.native_ns_.load(); });
}
