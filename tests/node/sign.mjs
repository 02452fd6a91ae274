// Signs webhook requests the way each provider does, with the provider's own library, for
// tests/tests/providers.rs: our verifier is checked against their signing code, not ours.
//
// stdin: a JSON array of {scheme, secret, body, timestamp, id}; stdout: a JSON array of
// header objects, one per request. Schemes: standard-webhooks (standardwebhooks), svix
// (svix: the same scheme under svix-* headers), stripe (stripe's generateTestHeaderString),
// github (@octokit/webhooks-methods), shopify (node:crypto: Shopify publishes no signing
// library; its documented recipe is base64 HMAC-SHA256 of the body with the app's secret).
import { createHmac } from "node:crypto";
import { Webhook as StandardWebhook } from "standardwebhooks";
import { Webhook as SvixWebhook } from "svix";
import Stripe from "stripe";
import { sign as githubSign } from "@octokit/webhooks-methods";

const stripe = new Stripe("sk_test_not_used_offline");

async function headersFor({ scheme, secret, body, timestamp, id }) {
  switch (scheme) {
    case "standard-webhooks":
      return {
        "webhook-id": id,
        "webhook-timestamp": String(timestamp),
        "webhook-signature": new StandardWebhook(secret).sign(id, new Date(timestamp * 1000), body),
      };
    case "svix":
      return {
        "svix-id": id,
        "svix-timestamp": String(timestamp),
        "svix-signature": new SvixWebhook(secret).sign(id, new Date(timestamp * 1000), body),
      };
    case "stripe":
      return {
        "Stripe-Signature": stripe.webhooks.generateTestHeaderString({ payload: body, secret, timestamp }),
      };
    case "github":
      return {
        "X-GitHub-Delivery": id,
        "X-GitHub-Event": "push",
        "X-Hub-Signature-256": await githubSign(secret, body),
      };
    case "shopify":
      return {
        "X-Shopify-Webhook-Id": id,
        "X-Shopify-Hmac-Sha256": createHmac("sha256", secret).update(body, "utf8").digest("base64"),
      };
    default:
      throw new Error(`unknown scheme ${scheme}`);
  }
}

let input = "";
for await (const chunk of process.stdin) input += chunk;
const out = [];
for (const request of JSON.parse(input)) out.push(await headersFor(request));
process.stdout.write(JSON.stringify(out));
