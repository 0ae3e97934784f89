// Peer "ws-node": the `ws` library on Node, the contract of the "websockets" kind in
// loadtests/peers/__init__.py (the same one ws_server.py serves).
//   NODE_PATH=CACHE/node/node_modules node ws_server.js PORT
// A client connects to /?room=NAME and joins NAME. Each text frame "<room>\n<text>" is
// sent as "text" to every other member of <room>, one `send` per member of the received
// bytes as ws's README broadcasts (no re-encoding per member); then the sender gets the
// text frame "ok". No per-message compression, no
// server pings, no optional native add-ons (bufferutil): ws as `npm install ws` gives it.
"use strict";

const http = require("http");
const { WebSocketServer } = require("ws");

const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error("usage: node ws_server.js PORT");
  process.exit(2);
}

const rooms = new Map();
const httpServer = http.createServer();
const wss = new WebSocketServer({ server: httpServer, perMessageDeflate: false });

wss.on("connection", (ws, request) => {
  const room = new URL(request.url, "http://x").searchParams.get("room") || "";
  let members = rooms.get(room);
  if (members === undefined) {
    members = new Set();
    rooms.set(room, members);
  }
  members.add(ws);
  ws.on("message", (data, isBinary) => {
    if (isBinary) {
      return;
    }
    const cut = data.indexOf(10); // "\n"
    if (cut < 0) {
      return;
    }
    const text = data.subarray(cut + 1);
    for (const member of rooms.get(data.toString("utf8", 0, cut)) || []) {
      if (member !== ws && member.readyState === 1) {
        member.send(text, { binary: false });
      }
    }
    ws.send("ok");
  });
  ws.on("error", () => {}); // a client that resets: no trace per connection
  ws.on("close", () => {
    members.delete(ws);
    if (members.size === 0 && rooms.get(room) === members) {
      rooms.delete(room);
    }
  });
});

httpServer.listen(port, "127.0.0.1");

function stop() {
  wss.close();
  httpServer.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 5000).unref();
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
