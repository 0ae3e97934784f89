// Peer "socketio-node": Socket.IO 4 on Node, the contract of loadtests/peers/__init__.py.
//   NODE_PATH=CACHE/node/node_modules node socketio_server.js PORT
// Engine.IO v4, WebSocket transport only, no per-message compression, default pings
// (pingInterval 25 s, pingTimeout 20 s). A socket joins the room named by its handshake
// query's `room`. Event "m" (room, text, ack): everyone else in the room gets "m" (text),
// then the sender's ack is called with no arguments. Nothing is printed per message.
"use strict";

const http = require("http");
const { Server } = require("socket.io");

const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error("usage: node socketio_server.js PORT");
  process.exit(2);
}

const httpServer = http.createServer();
const io = new Server(httpServer, {
  transports: ["websocket"],
  perMessageDeflate: false,
  httpCompression: false,
  maxHttpBufferSize: 1e6,
  serveClient: false,
});

io.on("connection", (socket) => {
  const room = socket.handshake.query.room;
  if (typeof room === "string" && room !== "") {
    socket.join(room);
  }
  socket.on("m", (target, text, ack) => {
    if (typeof target === "string") {
      socket.to(target).emit("m", text);
    }
    if (typeof ack === "function") {
      ack();
    }
  });
});

httpServer.listen(port, "127.0.0.1");

let stopping = false;
function stop() {
  if (stopping) {
    return;
  }
  stopping = true;
  io.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 5000).unref();
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
