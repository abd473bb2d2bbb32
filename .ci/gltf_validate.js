// Validate a .glb with the Khronos glTF validator (npm package gltf-validator);
// prints the report's counts and its errors/warnings as JSON.
const validator = require("gltf-validator");
const fs = require("fs");
validator
  .validateBytes(new Uint8Array(fs.readFileSync(process.argv[2])))
  .then((report) => {
    const issues = report.issues;
    const serious = issues.messages.filter((m) => m.severity <= 1).map((m) => `${m.code} ${m.pointer || ""}: ${m.message}`);
    console.log(JSON.stringify({ errors: issues.numErrors, warnings: issues.numWarnings, messages: serious.slice(0, 10) }));
  })
  .catch((error) => {
    console.error(String(error));
    process.exit(1);
  });
